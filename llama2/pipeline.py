"""The whole recipe of the paper, iteration by iteration (Llama 2 §2–§3, Figure 4).

    llama2 pipeline --config configs/pipeline/tiny.yaml [key=value ...] [--from-stage STAGE]

built-in world -> tokenizer -> pretraining -> SFT -> for each RLHF version V1…Vn:
    a weekly preference batch sampled from the latest model(s) and annotated (§3.2.1)
    -> helpfulness and safety reward models retrained on every batch so far (§3.2.2)
    -> rejection sampling from the latest model, pooling earlier versions' best answers from
       `pool_from_version` on (§3.2.3: from V3)
    -> from `ppo_from_version` on, PPO on top of the rejection-sampling checkpoint (as from V4 in the paper)
    -> in version `context_distill_after_version`, safety context distillation of that version's
       model, gated by its safety reward model (§4.2.4)
    -> in version `gatt_after_version`, Ghost Attention on that version's model (§3.3: after RLHF V3)
       and the multi-turn evaluation of instruction adherence, with and without it
    -> evaluation against the SFT model (§3.4)
-> with `redteam`, two red-teaming rounds (§4.3): against the SFT model, then against the final
   model with the first round's violating prompts (the share it now mitigates)
-> with `safety_scaling`, the safety-data scaling study (§4.2.3, Figures 15 and 33): with the
   helpfulness data fixed, 0 ... 100% of the safety data (the SFT model's best answers, or with
   `tuning: sft` the SFT dialogs on the pretrained model), judged by the final reward models
-> a compute-matched control (the SFT model trained on as many more steps of SFT data)
-> with `diversity`, Self-BLEU against temperature on factual and creative prompts (§5.1, Figure 21)
   for the SFT model, every version's final model and the control
-> summary.json and report.html.

Every stage writes into one run directory and is recorded in RUN/state.json when it finishes:
a killed pipeline resumes at the stage where it stopped (the interrupted stage resumes from its
own checkpoints where the recipe has them); `--from-stage` reruns from any stage. Any built-in
part can be replaced: your corpus, SFT dialogs, prompts, a base model (any format `llama2
convert` reads), a tokenizer, or reward models. The whole configuration — every stage's
settings and every file it names — is checked before any work starts.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llama2.config import ConfigError, from_dict, load_config, save_config, to_dict
from llama2.formats import AXES, read_records, write_jsonl
from llama2.gated_reward import prompt_axis
from llama2.recipes import (context_distill, diversity, gatt, multi_turn, ppo, pretrain, redteam, rejection_sampling,
                            reward_model, reward_scaling, safety_scaling, sft)
from llama2.recipes.evaluate import EvaluateConfig, compare_models, summary_lines
from llama2.report import REWARD_SCALING_DIR, write_report
from llama2.sampling import sample_responses
from llama2.train import derive_seed
from llama2.world.annotators import AnnotatorConfig, annotate_batch
from llama2.world.generate import generate_world


@dataclass
class AnnotateConfig:
    temperatures: list[float] = field(default_factory=lambda: [0.7, 1.1])  # §3.2.1: two temperatures...
    variants: int = 2  # ...and/or two model variants: the latest model and the previous version
    max_new_tokens: int = 64
    prompts_per_batch: int = 0  # 0 = every prompt of the batch
    # Held-out prompts per batch, whose pairs measure the reward models on the policy's own answers:
    # the batch's own test prompts first, then the other batches' (never trained on either).
    # 0 = the batch's own (a quarter of prompts_per_batch when that is set).
    test_prompts_per_batch: int = 0
    noise: float = 0.25  # the simulated annotators' perception noise


@dataclass
class PipelineConfig:
    out_dir: str = "runs/pipeline"
    versions: int = 3  # RLHF-V1 ... Vn
    ppo_from_version: int = 3  # PPO on top of rejection sampling from this version on (0 = never)
    # Ghost Attention on this version's RLHF model (§3.3: after RLHF V3), then the multi-turn
    # evaluation of the GAtt model against the model before it; later versions start from it. 0 = never.
    gatt_after_version: int = 0
    # Safety context distillation (§4.2.4) of this version's RLHF model, gated by its safety RM; later
    # versions start from it. 0 = never.
    context_distill_after_version: int = 0
    redteam: bool = False  # two red-teaming rounds (§4.3): the SFT model, then the final model
    safety_scaling: bool = False  # the safety-data scaling study (§4.2.3, Figures 15 and 33)
    # Rejection sampling pools the best answers of every earlier version from this version on
    # (§3.2.3: "up to RLHF V3 [...] only from the samples collected from the previous iteration";
    # from V3 on, all earlier iterations' top samples). 0 = never.
    pool_from_version: int = 3
    control: bool = True  # train and evaluate the compute-matched extra-SFT control
    # Self-BLEU vs temperature (§5.1, Figure 21) of the SFT model, every version's final model and the
    # control, on the evaluation prompts' factual and creative ones; options: diversity_options
    diversity: bool = False
    # data: the built-in world unless your files are named
    world_seed: int = 0
    world_size: str = "tiny"
    pretrain_corpus: list[str] = field(default_factory=list)  # default: WORLD/corpus/pretrain.jsonl
    sft_train: list[str] = field(default_factory=list)  # default: WORLD/sft/train.jsonl
    sft_eval: list[str] = field(default_factory=list)  # default: WORLD/sft/test.jsonl
    prompts: list[str] = field(default_factory=list)  # RLHF prompts; `batch` = weekly batch (default: WORLD/prompts/train.jsonl)
    test_prompts: list[str] = field(default_factory=list)  # held-out prompts per batch (default: WORLD/prompts/test_batch*.jsonl)
    eval_prompts: list[str] = field(default_factory=list)  # never trained on (default: WORLD/prompts/eval.jsonl)
    extra_preferences: list[str] = field(default_factory=list)  # e.g. open-source pairs; default: WORLD offline pairs
    # models you can bring instead of training them
    base_model: str = ""  # skip pretraining: start SFT from this checkpoint (native/HF/Meta/GGUF)
    tokenizer: str = ""  # use this tokenizer instead of training one on the corpus
    helpfulness_rm: str = ""  # skip reward-model training: use these reward models for every version
    safety_rm: str = ""
    # each stage's settings: overrides of the stage recipe's config (see configs/<stage>/)
    pretrain: dict = field(default_factory=dict)
    sft: dict = field(default_factory=dict)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    reward: dict = field(default_factory=dict)
    rejection_sampling: dict = field(default_factory=dict)
    ppo: dict = field(default_factory=dict)
    gatt: dict = field(default_factory=dict)  # llama2 rlhf gatt's options (configs/rlhf/gatt_tiny.yaml)
    context_distill: dict = field(default_factory=dict)  # llama2 rlhf context-distill's options
    redteam_options: dict = field(default_factory=dict)  # llama2 redteam's options (per_seed, attack_vectors, ...)
    safety_scaling_options: dict = field(default_factory=dict)  # llama2 study safety-scaling's options
    multi_turn: dict = field(default_factory=dict)  # llama2 evaluate multi-turn's options
    diversity_options: dict = field(default_factory=dict)  # llama2 evaluate diversity's options (samples, temperatures, ...)
    evaluate: dict = field(default_factory=dict)
    seed: int = 0
    device: str = "auto"


# ----------------------------------------------------------------------------- plan and checks


def stage_names(cfg: PipelineConfig) -> list[str]:
    names = ["world", "pretrain", "sft"]
    for v in range(1, cfg.versions + 1):
        names += [f"v{v}.annotate", f"v{v}.reward", f"v{v}.rejection_sampling"]
        if cfg.ppo_from_version and v >= cfg.ppo_from_version:
            names.append(f"v{v}.ppo")
        if v == cfg.context_distill_after_version:
            names.append(f"v{v}.context_distill")
        if v == cfg.gatt_after_version:
            names += [f"v{v}.gatt", f"v{v}.multi_turn"]
        names.append(f"v{v}.eval")
    if cfg.redteam:
        names.append("redteam")
    if cfg.safety_scaling:
        names.append("safety_scaling")
    if cfg.control:
        names += ["control", "control.eval"]
    if cfg.diversity:
        names.append("diversity")
    return names + ["summary"]


class Run:
    """Paths of one pipeline run and its record of finished stages."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.root = Path(cfg.out_dir)
        self.world = self.root / "world"
        self.state_file = self.root / "state.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {"done": {}}

    def done(self, stage: str) -> bool:
        return stage in self.state["done"]

    def output(self, stage: str, key: str = "model"):
        return self.state["done"][stage][key]

    def finish(self, stage: str, outputs: dict, seconds: float) -> None:
        self.state["done"][stage] = {**outputs, "seconds": round(seconds, 1)}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(self.state_file)

    def forget_from(self, stage: str, order: list[str]) -> None:
        """--from-stage: this stage and every later one run again, from scratch."""
        if stage not in order:
            raise ConfigError(f"--from-stage: unknown stage {stage!r}; stages: {', '.join(order)}")
        for name in order[order.index(stage):]:
            self.state["done"].pop(name, None)
            shutil.rmtree(self.stage_dir(name), ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(json.dumps(self.state, indent=2) + "\n")

    def stage_dir(self, stage: str) -> Path:
        if stage == "world":
            return self.world
        if stage == "summary":
            return self.root / "summary"
        return self.root.joinpath(*stage.split("."))

    # -- data paths (built-in world unless given)
    def files(self, given: list[str], *default: str) -> list[str]:
        if given:
            return list(given)
        return [str(p) for pattern in default for p in sorted(self.world.glob(pattern))] or \
            [str(self.world / d) for d in default]


def has_checkpoint(out: Path) -> bool:
    """Did an interrupted training stage leave a complete checkpoint to resume from?"""
    return any((out / "checkpoints").glob("step-*/train_state.json"))


def _exists(path: str, what: str) -> None:
    if path and path != "grader" and not Path(path).exists():
        raise ConfigError(f"{what}: {path} does not exist")


def check(cfg: PipelineConfig) -> None:
    """Everything that can be checked before work starts: stage configs and the files they name."""
    if cfg.versions < 1:
        raise ConfigError("versions: at least one RLHF version is needed")
    if not 0 <= cfg.context_distill_after_version <= cfg.versions:
        raise ConfigError(f"context_distill_after_version: {cfg.context_distill_after_version} is not one of the "
                          f"versions 1..{cfg.versions} (0 = no context distillation)")
    if not 0 <= cfg.gatt_after_version <= cfg.versions:
        raise ConfigError(f"gatt_after_version: {cfg.gatt_after_version} is not one of the versions 1..{cfg.versions} "
                          f"(0 = no Ghost Attention)")
    for name, cls in [("pretrain", pretrain.PretrainConfig), ("sft", sft.SFTConfig), ("reward", reward_model.RewardConfig),
                      ("rejection_sampling", rejection_sampling.RejectionSamplingConfig), ("ppo", ppo.PPOConfig),
                      ("gatt", gatt.GattConfig), ("multi_turn", multi_turn.MultiTurnConfig),
                      ("context_distill", context_distill.ContextDistillConfig),
                      ("redteam_options", redteam.RedteamConfig),
                      ("safety_scaling_options", safety_scaling.SafetyScalingConfig), ("evaluate", EvaluateConfig)]:
        from_dict(cls, getattr(cfg, name), f"pipeline config '{name}'")
    # the stage names the models and prompts; the rest (samples, temperatures, ...) is checked now
    diversity.check_config(from_dict(diversity.DiversityConfig, {**cfg.diversity_options, "models": ["-"],
                                                                 "prompts": ["-"]}, "pipeline config 'diversity_options'"))
    for key in ("pretrain_corpus", "sft_train", "sft_eval", "prompts", "test_prompts", "eval_prompts",
                "extra_preferences"):
        for p in getattr(cfg, key):
            _exists(p, key)
    for key in ("base_model", "tokenizer", "helpfulness_rm", "safety_rm"):
        _exists(getattr(cfg, key), key)
    # pretrain_mix reads this run's pretraining tokens unless pretrain_data names others
    for name, options in (("sft", cfg.sft), ("rejection_sampling.sft", cfg.rejection_sampling.get("sft", {})),
                          ("safety_scaling_options.sft", cfg.safety_scaling_options.get("sft", {}))):
        if options.get("pretrain_mix", 0) > 0 and cfg.base_model and not options.get("pretrain_data"):
            raise ConfigError(f"{name}.pretrain_mix: with base_model there are no pretraining tokens of this run; "
                              f"set {name}.pretrain_data (llama2 data pretokenize) or pretrain_mix: 0")
    if bool(cfg.helpfulness_rm) != bool(cfg.safety_rm) and not cfg.helpfulness_rm:
        raise ConfigError("safety_rm given without helpfulness_rm")
    # your own prompts must hold some of the kinds rejection sampling and PPO are told to use
    if cfg.prompts:
        kinds = {prompt_axis(r) for p in cfg.prompts for r in read_records(p, "prompts")}
        for name in ("rejection_sampling", "ppo"):
            axes = (getattr(cfg, name) or {}).get("reward_axes", AXES)
            if not kinds & set(axes):
                raise ConfigError(f"{name}.reward_axes: {axes}, but prompts {cfg.prompts} hold only "
                                  f"{sorted(kinds)} prompts (a prompt is a safety one when `is_safety` is true)")


# ----------------------------------------------------------------------------- stages


def stage_world(run: Run, cfg: PipelineConfig) -> dict:
    if not (run.world / "manifest.json").is_file():
        generate_world(run.world, seed=cfg.world_seed, size=cfg.world_size)
    return {"dir": str(run.world)}


def stage_pretrain(run: Run, cfg: PipelineConfig, out: Path, resume: bool) -> dict:
    if cfg.base_model:
        return {"model": cfg.base_model, "skipped": "base_model given"}
    pc = from_dict(pretrain.PretrainConfig, {**cfg.pretrain, "out_dir": str(out), "seed": cfg.seed, "device": cfg.device,
                                    "data": {**cfg.pretrain.get("data", {}),
                                             "corpus": run.files(cfg.pretrain_corpus, "corpus/pretrain.jsonl"),
                                             **({"tokenizer": cfg.tokenizer} if cfg.tokenizer else {})}},
                   "pipeline.pretrain")
    pretrain.main(pc, resume=resume and has_checkpoint(out))
    return {"model": str(out / "final")}


def with_pretrain_tokens(run: Run, options: dict) -> dict:
    """SFT options with `pretrain_data` pointing at this run's pretraining tokens when `pretrain_mix`
    asks for them and none are given."""
    pretrain_tokens = run.root / "pretrain" / "tokens"
    if options.get("pretrain_mix", 0) > 0 and not options.get("pretrain_data") and pretrain_tokens.is_dir():
        return {**options, "pretrain_data": str(pretrain_tokens)}
    return options


def stage_sft(run: Run, cfg: PipelineConfig, out: Path, resume: bool, model: str, extra: dict | None = None) -> dict:
    over = with_pretrain_tokens(run, {**cfg.sft, **(extra or {})})
    sc = from_dict(sft.SFTConfig, {**over, "out_dir": str(out), "model": model, "seed": cfg.seed, "device": cfg.device,
                               "train_data": run.files(cfg.sft_train, "sft/train.jsonl"),
                               "eval_data": run.files(cfg.sft_eval, "sft/test.jsonl")}, "pipeline.sft")
    sft.main(sc, resume=resume and has_checkpoint(out))
    return {"model": str(out / "final"), "steps": _logged_steps(out / "metrics.jsonl")}


def _batch_prompts(run: Run, cfg: PipelineConfig, version: int) -> tuple[list[dict], list[dict]]:
    """The weekly batch's prompts and its held-out test prompts (batches cycle if there are fewer)."""
    train = [r for p in run.files(cfg.prompts, "prompts/train.jsonl") for r in read_records(p, "prompts")
             if r["split"] == "train"]
    batches = sorted({r["batch"] for r in train if r.get("batch") is not None}) or [None]
    b = batches[(version - 1) % len(batches)]
    mine = [r for r in train if r.get("batch") == b]
    every_test = [r for p in run.files(cfg.test_prompts, "prompts/test_batch*.jsonl") for r in read_records(p, "prompts")]
    tests = [r for r in every_test if r.get("batch") in (b, None)] or every_test
    if cfg.annotate.prompts_per_batch:
        mine = mine[: cfg.annotate.prompts_per_batch]
        tests = tests[: max(1, cfg.annotate.prompts_per_batch // 4)]
    if cfg.annotate.test_prompts_per_batch:
        own = {r["id"] for r in tests}
        others = sorted((r for r in every_test if r["id"] not in own), key=lambda r: r.get("batch") != b)
        tests = (tests + others)[: cfg.annotate.test_prompts_per_batch]
    return mine, tests


def stage_annotate(run: Run, cfg: PipelineConfig, out: Path, version: int, policies: list[str]) -> dict:
    """A weekly batch (§3.2.1): two answers per prompt from two (model variant, temperature) arms,
    judged by the simulated annotators; test prompts give the batch's held-out pairs."""
    records, tests = _batch_prompts(run, cfg, version)
    for r in tests:
        r["split"] = "test"
    variants = policies[: max(1, cfg.annotate.variants)]

    def sample_fn(batch_records, model_path, temperature):
        return sample_responses(model_path, batch_records, temperature, derive_seed(cfg.seed, version),
                                cfg.annotate.max_new_tokens)

    pairs, stats = annotate_batch(records + tests, sample_fn, variants=variants, temperatures=cfg.annotate.temperatures,
                                  batch=version, seed=derive_seed(cfg.seed, version), config=AnnotatorConfig(noise=cfg.annotate.noise),
                                  source=f"simulated:v{version}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"batch{version}.jsonl"
    write_jsonl(path, pairs)
    (out / "stats.json").write_text(json.dumps(stats.summary(), indent=2) + "\n")
    return {"pairs": str(path), "count": len(pairs)}


def stage_reward(run: Run, cfg: PipelineConfig, out: Path, resume: bool, version: int, model: str) -> dict:
    """Both reward models, retrained on every batch so far plus the extra (open-source-like) pairs."""
    if cfg.helpfulness_rm:
        return {"helpfulness": cfg.helpfulness_rm, "safety": cfg.safety_rm or cfg.helpfulness_rm,
                "skipped": "reward models given"}
    batches = [run.output(f"v{v}.annotate", "pairs") for v in range(1, version + 1)]
    extra = run.files(cfg.extra_preferences, "preferences/offline_train.jsonl")
    held_out = [] if cfg.extra_preferences else run.files([], "preferences/offline_test.jsonl")
    # The extra pairs play the open-source datasets' part in the mixes (§3.2.2)
    open_source = sorted({r["source"] for p in extra for r in read_records(p, "preferences")})
    mix = {"open_source": open_source, **cfg.reward.get("mix", {})}
    outputs = {}
    for objective in AXES:
        d = out.parent / f"reward_{objective}"
        rc = from_dict(reward_model.RewardConfig,
                       {**cfg.reward, "mix": mix, "out_dir": str(d), "model": model, "objective": objective,
                        "train_data": batches + extra, "eval_data": held_out, "seed": cfg.seed, "device": cfg.device},
                       "pipeline.reward")
        reward_model.main(rc, resume=resume and has_checkpoint(d))
        outputs[objective] = str(d / "final")
        on_policy = reward_model.on_policy_accuracy(outputs[objective], batches[-1], objective)
        (d / "eval" / "on_policy.json").write_text(json.dumps(on_policy, indent=1) + "\n")
        outputs[f"{objective}_on_policy"] = on_policy
        report_on_policy_accuracy(cfg, on_policy, objective, version)
    return outputs


def report_on_policy_accuracy(cfg: PipelineConfig, got: dict, objective: str, version: int) -> None:
    """Print `on_policy_accuracy`, and say so when the reward model is at chance against the
    graders (the interval holds 0.5, over at least 50 ranked pairs) while rejection sampling or
    PPO still optimise it (`reward_axes`)."""
    if not got:
        return
    ranked, truth = got["graders_ranked"], got["labels_ranked"]
    n, lo = ranked["n"], ranked["ci95"][0]
    stages = ["rejection_sampling"] + (["ppo"] if f"v{version}.ppo" in stage_names(cfg) else [])
    users = [stage for stage in stages
             if objective in (getattr(cfg, stage) or {}).get("reward_axes", AXES)]
    note = ""
    if n < 50:
        note = ": too few ranked pairs to tell it from chance"
    elif lo <= 0.5:
        note = (f": at chance, yet {' and '.join(users)} optimise{'s' if len(users) == 1 else ''} it "
                f"(see reward_axes)" if users
                else ": at chance; left out of reward_axes")
    def fmt(a: dict) -> str:
        return "n/a" if a["accuracy"] is None else f"{a['accuracy']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"

    print(f"[pipeline]   {objective} RM on batch {version}'s {got['pairs']} held-out pairs ({got['grader_ties']} that "
          f"the graders tie): on the {n} they rank, {fmt(ranked)} vs the graders, {fmt(truth)} vs the annotators; "
          f"all pairs {fmt(got['labels_all'])} vs the annotators{note}", flush=True)


def earlier_pools(run: Run, cfg: PipelineConfig, version: int) -> list[str]:
    """The pool files of earlier versions that version `version`'s rejection sampling selects from
    beside its own samples: none before `pool_from_version`, all of them from it on (§3.2.3)."""
    if not cfg.pool_from_version or version < cfg.pool_from_version:
        return []
    return sorted(str(p) for v in range(1, version) for p in (run.root / f"v{v}" / "rejection_sampling" / "pool").glob("*.jsonl"))


def _logged_steps(*metrics: Path) -> int:
    """Optimizer steps a training stage logged: the lines of its metrics.jsonl file(s)."""
    return sum(len(m.read_text().splitlines()) for m in metrics if m.is_file())


def _stats(out: Path) -> dict:
    return json.loads((out / "stats.json").read_text()) if (out / "stats.json").is_file() else {}


def stage_rejection_sampling(run: Run, cfg: PipelineConfig, out: Path, resume: bool, version: int, policy: str,
                             rms: dict) -> dict:
    pools = earlier_pools(run, cfg, version)
    over = dict(cfg.rejection_sampling)
    if over.get("replay_examples") and not over.get("replay"):
        over["replay"] = run.files(cfg.sft_train, "sft/train.jsonl")  # the run's SFT dialogs
    if "sft" in over:
        over["sft"] = with_pretrain_tokens(run, over["sft"])
    rc = from_dict(rejection_sampling.RejectionSamplingConfig, {**over, "out_dir": str(out), "policy": policy, "iterations": 1,
                                             "prompts": run.files(cfg.prompts, "prompts/train.jsonl"),
                                             "helpfulness_rm": rms["helpfulness"], "safety_rm": rms["safety"],
                                             "pool_from": pools, "seed": derive_seed(cfg.seed, version), "device": cfg.device},
                   "pipeline.rejection_sampling")
    rejection_sampling.main(rc, resume=resume)
    steps = _logged_steps(*sorted(out.glob("iter-*/sft/metrics.jsonl")))
    return {"model": str((out / "final").resolve()), "steps": steps, "stats": _stats(out)}


def stage_ppo(run: Run, cfg: PipelineConfig, out: Path, resume: bool, version: int, policy: str, rms: dict) -> dict:
    pc = from_dict(ppo.PPOConfig, {**cfg.ppo, "out_dir": str(out), "policy": policy,
                               "prompts": run.files(cfg.prompts, "prompts/train.jsonl"),
                               "eval_prompts": run.files(cfg.test_prompts, "prompts/test_batch*.jsonl"),
                               "helpfulness_rm": rms["helpfulness"], "safety_rm": rms["safety"],
                               "seed": derive_seed(cfg.seed, version), "device": cfg.device}, "pipeline.ppo")
    ppo.main(pc, resume=resume and has_checkpoint(out))
    return {"model": str(out / "final"), "steps": _logged_steps(out / "metrics.jsonl")}


def stage_gatt(run: Run, cfg: PipelineConfig, out: Path, version: int, policy: str) -> dict:
    """Ghost Attention (§3.3) on `policy`: answers sampled with the instruction on every user turn of
    the run's SFT dialogs, fine-tuned with it in the first turn only (llama2 rlhf gatt)."""
    over = dict(cfg.gatt)
    if "sft" in over:
        over["sft"] = with_pretrain_tokens(run, over["sft"])
    dialogs = run.files(cfg.sft_train, "sft/train.jsonl")
    if over.get("mix_share") and not over.get("mix_data"):
        over["mix_data"] = dialogs
    gc = from_dict(gatt.GattConfig, {**over, "seed": derive_seed(cfg.seed, version), "device": cfg.device},
                   "pipeline.gatt")
    model = gatt.run(policy, dialogs, out, gc)
    return {"model": str(model), "steps": _logged_steps(out / "sft" / "metrics.jsonl"), "stats": _stats(out)}


def stage_context_distill(run: Run, cfg: PipelineConfig, out: Path, version: int, policy: str, rms: dict) -> dict:
    """Safety context distillation (§4.2.4) of `policy` on the run's adversarial prompts, each distilled
    answer kept only where version `version`'s safety RM scores it above the answer without the preprompt."""
    over = dict(cfg.context_distill)
    if "sft" in over:
        over["sft"] = with_pretrain_tokens(run, over["sft"])
    cc = from_dict(context_distill.ContextDistillConfig,
                   {**over, "seed": derive_seed(cfg.seed, version), "device": cfg.device}, "pipeline.context_distill")
    model = context_distill.run(policy, run.files(cfg.prompts, "prompts/train.jsonl"), out, cc, rms["safety"])
    return {"model": str(model), "steps": _logged_steps(out / "sft" / "metrics.jsonl"), "stats": _stats(out)}


def stage_redteam(run: Run, cfg: PipelineConfig, out: Path, sft_model: str, final: str) -> dict:
    """Two red-teaming rounds (§4.3): the SFT model, then the final model, which is also asked the
    first round's violating prompts (the share it now mitigates; the paper: 90%)."""
    rc = from_dict(redteam.RedteamConfig, {**cfg.redteam_options, "seed": cfg.seed}, "pipeline.redteam_options")
    first = redteam.run(sft_model, out / "round1", rc, round_=1)
    second = redteam.run(final, out / "round2", rc, [str(out / "round1" / "violations.jsonl")], round_=2)
    return {"round1": str(out / "round1" / "redteam.json"), "round2": str(out / "round2" / "redteam.json"),
            "gamma": [first.get("gamma"), second.get("gamma")]}


def stage_safety_scaling(run: Run, cfg: PipelineConfig, out: Path, sft_model: str, rms: dict) -> dict:
    """The safety-data scaling study (§4.2.3): the SFT model's best answers to the training prompts
    under the final reward models, fine-tuned on with each share of the safety answers, measured on
    the evaluation prompts."""
    over = dict(cfg.safety_scaling_options)
    if over.get("tuning") == "sft":
        # §4.2.3 as the paper ran it: the pretrained model fine-tuned by §3.1's procedure (this run's
        # SFT settings) on the run's helpfulness SFT dialogs and a share of its safety ones
        over = {"data": run.files(cfg.sft_train, "sft/train.jsonl"), "init": run.output("pretrain"), **over,
                "sft": {**cfg.sft, **over.get("sft", {})}}
    if "sft" in over:
        over["sft"] = with_pretrain_tokens(run, over["sft"])
    sc = from_dict(safety_scaling.SafetyScalingConfig,
                   {**over, "out_dir": str(out), "policy": sft_model, "prompts": run.files(cfg.prompts, "prompts/train.jsonl"),
                    "helpfulness_rm": rms["helpfulness"], "safety_rm": rms["safety"],
                    "eval_prompts": run.files(cfg.eval_prompts, "prompts/eval.jsonl"), "seed": cfg.seed,
                    "device": cfg.device}, "pipeline.safety_scaling_options")
    safety_scaling.main(sc, resume=out.exists())
    return {"study": str(out / "safety_scaling.json"), "steps": _logged_steps(*sorted(out.glob("share-*/sft/metrics.jsonl")))}


def stage_diversity(run: Run, cfg: PipelineConfig, out: Path, models: dict[str, str]) -> dict:
    """Self-BLEU vs temperature (§5.1, Figure 21) of `models` (label -> path) on the factual and creative
    evaluation prompts (llama2 evaluate diversity); diversity.json also maps each path to its label."""
    dc = from_dict(diversity.DiversityConfig,
                   {**cfg.diversity_options, "out_dir": str(out), "models": list(dict.fromkeys(models.values())),
                    "prompts": run.files(cfg.eval_prompts, "prompts/eval.jsonl"), "seed": cfg.seed,
                    "device": cfg.device}, "pipeline.diversity_options")
    diversity.main(dc, labels={path: label for label, path in reversed(models.items())})
    return {"diversity": str(out / "diversity.json"), "models": models}


def stage_multi_turn(run: Run, cfg: PipelineConfig, out: Path, model: str, baseline: str) -> dict:
    """Instruction adherence turn by turn (Appendix A.3.5, Figure 10), with and without GAtt."""
    mc = from_dict(multi_turn.MultiTurnConfig,
                   {**cfg.multi_turn, "out_dir": str(out), "model": model, "baseline": baseline,
                    "prompts": run.files(cfg.eval_prompts, "prompts/eval.jsonl"), "device": cfg.device},
                   "pipeline.multi_turn")
    multi_turn.main(mc)
    return {"multi_turn": str(out / "multi_turn.json")}


def stage_eval(run: Run, cfg: PipelineConfig, out: Path, model: str, baselines: list[str], rms: dict) -> dict:
    # the world's escalating multi-turn attacks (§4.4, Figure 18) unless the evaluate block names others
    attacks = cfg.evaluate.get("multi_turn_prompts") or [
        p for p in run.files([], "prompts/adversarial_multi_turn_eval.jsonl") if Path(p).is_file()]
    ec = from_dict(EvaluateConfig, {**cfg.evaluate, "out_dir": str(out), "model": model, "baselines": baselines,
                                    "multi_turn_prompts": attacks,
                                    "prompts": run.files(cfg.eval_prompts, "prompts/eval.jsonl"),
                                    "helpfulness_rm": rms.get("helpfulness", ""), "safety_rm": rms.get("safety", ""),
                                    "seed": cfg.seed, "answers_cache": str(run.root / "eval_answers")},
                   "pipeline.evaluate")
    result = compare_models(ec)
    for line in summary_lines(result):
        print(f"[pipeline]   {line}", flush=True)
    return {"eval": str(out / "eval.json")}


def summarize(run: Run, cfg: PipelineConfig) -> dict:
    final_v = cfg.versions
    summary = {"run": str(run.root), "final_model": run.output(f"v{final_v}.eval", "model_path"),
               "sft_model": run.output("sft"), "seconds": {k: v.get("seconds") for k, v in run.state["done"].items()}}
    summary["versions"] = {}
    for v in range(1, final_v + 1):
        ev = json.loads(Path(run.output(f"v{v}.eval", "eval")).read_text())
        summary["versions"][f"v{v}"] = {
            "helpfulness": ev["model"]["helpfulness"],
            "violation_rate": ev["model"].get("safety", {}).get("violation_rate"),
            "false_refusal_helpful": ev["model"]["false_refusal_helpful"],
            "false_refusal_borderline": ev["model"]["false_refusal_borderline"],
            "win_rate_vs_sft": ev["vs_baseline0"],
            # the reward models that trained this version, on its batch's held-out pairs
            "reward_models_on_policy": {objective: run.state["done"].get(f"v{v}.reward", {}).get(f"{objective}_on_policy")
                                        for objective in AXES},
        }
    last = json.loads(Path(run.output(f"v{final_v}.eval", "eval")).read_text())
    summary["sft"] = {k: last["baseline0"][k] for k in ("helpfulness", "false_refusal_helpful", "false_refusal_borderline")}
    summary["sft"]["violation_rate"] = last["baseline0"].get("safety", {}).get("violation_rate")
    if cfg.control and run.done("control.eval"):
        ctrl = json.loads(Path(run.output("control.eval", "eval")).read_text())
        summary["final_vs_control"] = ctrl["vs_baseline0"]
        summary["control"] = {"helpfulness": ctrl["baseline0"]["helpfulness"],
                              "violation_rate": ctrl["baseline0"].get("safety", {}).get("violation_rate")}
    return summary


# ----------------------------------------------------------------------------- the loop


def main(cfg: PipelineConfig, resume: bool = True, from_stage: str | None = None) -> int:
    check(cfg)
    run = Run(cfg)
    order = stage_names(cfg)
    if from_stage:
        run.forget_from(from_stage, order)
    run.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.root / "config.yaml")
    t_all = time.time()
    for i, stage in enumerate(order):
        if run.done(stage):
            continue
        out = run.stage_dir(stage)
        interrupted = out.exists()
        print(f"[pipeline] stage {i + 1}/{len(order)}: {stage}" + (" (resuming)" if interrupted else ""), flush=True)
        t0 = time.time()
        outputs = run_stage(run, cfg, stage, out, interrupted)
        run.finish(stage, outputs, time.time() - t0)
        print(f"[pipeline] {stage} done in {time.time() - t0:.0f}s", flush=True)
    report = write_report(run.root)
    summary = json.loads((run.root / "summary.json").read_text())
    final = summary["final_model"]
    print(f"[pipeline] finished in {time.time() - t_all:.0f}s (this session)")
    print(f"[pipeline] report: {report}")
    print(f"[pipeline] chat with the result: llama2 chat --model {final}")
    return 0


def run_stage(run: Run, cfg: PipelineConfig, stage: str, out: Path, resume: bool) -> dict:
    sft_model = run.output("sft") if run.done("sft") else None
    if stage == "world":
        return stage_world(run, cfg)
    if stage == "pretrain":
        return stage_pretrain(run, cfg, out, resume)
    if stage == "sft":
        return stage_sft(run, cfg, out, resume, run.output("pretrain"))
    if stage == "control":
        # as many more optimizer steps of SFT data as the RLHF stages took, from the SFT model
        extra = sum(run.state["done"][s].get("steps", 0) for s in run.state["done"]
                    if s.endswith((".rejection_sampling", ".ppo", ".context_distill", ".gatt")))
        sft_steps = max(1, run.state["done"]["sft"].get("steps", 1))
        epochs = from_dict(sft.SFTConfig, cfg.sft, "pipeline.sft").epochs
        return {**stage_sft(run, cfg, out, resume, sft_model, {"epochs": epochs * extra / sft_steps}),
                "matched_steps": extra}
    if stage == "control.eval":
        final = run.output(f"v{cfg.versions}.eval", "model_path")
        return stage_eval(run, cfg, out, final, [run.output("control"), sft_model], _rms(run, cfg.versions))
    if stage == "redteam":
        return stage_redteam(run, cfg, out, sft_model, run.output(f"v{cfg.versions}.eval", "model_path"))
    if stage == "safety_scaling":
        return stage_safety_scaling(run, cfg, out, sft_model, _rms(run, cfg.versions))
    if stage == "diversity":
        models = {"SFT": sft_model, **{f"v{v}": run.output(f"v{v}.eval", "model_path") for v in range(1, cfg.versions + 1)},
                  **({"control": run.output("control")} if run.done("control") else {})}
        return stage_diversity(run, cfg, out, models)
    if stage == "summary":
        summary = summarize(run, cfg)
        (run.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return {"summary": str(run.root / "summary.json")}
    version, step = stage.split(".")
    v = int(version[1:])
    latest = _latest_policy(run, v)
    if step == "annotate":
        previous = _latest_policy(run, v - 1) if v > 1 else None
        policies = [latest] + ([previous] if previous and previous != latest else [])
        return stage_annotate(run, cfg, out, v, policies)
    if step == "reward":
        return stage_reward(run, cfg, out, resume, v, latest)
    if step == "rejection_sampling":
        return stage_rejection_sampling(run, cfg, out, resume, v, latest, _rms(run, v))
    if step == "ppo":
        return stage_ppo(run, cfg, out, resume, v, run.output(f"v{v}.rejection_sampling"), _rms(run, v))
    if step == "context_distill":
        return stage_context_distill(run, cfg, out, v, _trained_policy(run, v), _rms(run, v))
    if step == "gatt":
        return stage_gatt(run, cfg, out, v, _trained_policy(run, v))
    if step == "multi_turn":
        return stage_multi_turn(run, cfg, out, run.output(f"v{v}.gatt"), _trained_policy(run, v, gatt=False))
    if step == "eval":
        model = _trained_policy(run, v)
        return {**stage_eval(run, cfg, out, model, [sft_model], _rms(run, v)), "model_path": model}
    raise ConfigError(f"unknown stage {stage!r}")


def _rms(run: Run, version: int) -> dict:
    return {k: run.output(f"v{version}.reward", k) for k in AXES}


def _trained_policy(run: Run, version: int, gatt: bool = True) -> str:
    """Version `version`'s newest model so far: GAtt's (unless `gatt` is false), PPO's, or rejection
    sampling's."""
    stages = ((f"v{version}.gatt",) if gatt else ()) + (f"v{version}.context_distill", f"v{version}.ppo",
                                                          f"v{version}.rejection_sampling")
    for stage in stages:
        if run.done(stage):
            return run.output(stage)
    raise ConfigError(f"version {version} has no trained model yet")


def _latest_policy(run: Run, version: int) -> str:
    """The newest chat model before version `version`'s training: the previous version's, else SFT."""
    for v in range(version - 1, 0, -1):
        if run.done(f"v{v}.rejection_sampling"):
            return _trained_policy(run, v)
    return run.output("sft")


# ----------------------------------------------------------------------------- studies of a finished run


def reward_scaling_config(run_dir: str | Path) -> reward_scaling.ScalingConfig:
    """Figure 6's study on a pipeline run's own reward data: its weekly batches
    (`vK/annotate/batchK.jsonl`, in order) as the training pairs, the last batch's held-out pairs as
    the test set, its SFT model as the one model, and its reward settings without `max_steps`, so
    that more pairs are more steps (`reward.epochs`, one by default). Output: RUN/studies/reward_scaling,
    where the report looks for it."""
    run = Path(run_dir)
    if not (run / "state.json").is_file() or not (run / "config.yaml").is_file():
        raise ConfigError(f"--run: {run} is not a pipeline run (no state.json and config.yaml)")
    cfg = load_config(PipelineConfig, run / "config.yaml")
    done = json.loads((run / "state.json").read_text())["done"]
    batches = []
    while f"v{len(batches) + 1}.annotate" in done:
        v = len(batches) + 1
        path = run / f"v{v}" / "annotate" / f"batch{v}.jsonl"
        if not path.is_file():
            raise ConfigError(f"--run: {path} is missing (stage v{v}.annotate is recorded as done)")
        batches.append(str(path))
    if not batches:
        raise ConfigError(f"--run: {run} has no finished weekly batch yet (stage v1.annotate)")
    if "sft" not in done:
        raise ConfigError(f"--run: {run} has no SFT model yet (stage sft)")
    sft_model = run / "sft" / "final"
    return reward_scaling.ScalingConfig(
        out_dir=str(run / REWARD_SCALING_DIR), models=[str(sft_model) if sft_model.is_dir() else done["sft"]["model"]],
        train_data=batches, test_data=batches[-1:], reward={k: v for k, v in cfg.reward.items() if k != "max_steps"},
        seed=cfg.seed, device=cfg.device)


def reward_scaling_cli(argv: list[str]) -> int:
    """`llama2 study reward-scaling-run --run RUN_DIR [--config FILE] [key=value ...]`; more model sizes
    with `models=[RUN/sft/final,OTHER/sft/final]`."""
    p = argparse.ArgumentParser(prog="llama2 study reward-scaling-run",
                                description="Reward-model accuracy vs preference pairs and model size (Llama 2 "
                                            "Figure 6) on a pipeline run's weekly batches; the run's report shows it.",
                                epilog="Defaults come from the run (see reward_scaling_config); a YAML file and "
                                       "key=value overrides of the study's fields apply on top, e.g. "
                                       "models=[RUN/sft/final,BIG/sft/final] points=[0.25,0.5,1] reward.epochs=2 "
                                       "objective=safety.")
    p.add_argument("--run", required=True, help="a pipeline run directory with at least one weekly batch")
    p.add_argument("--config", help="YAML file of study fields (llama2 study reward-scaling --print-config)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    cfg = load_config(reward_scaling.ScalingConfig, a.config, a.overrides, base=reward_scaling_config(a.run))
    if a.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    reward_scaling.main(cfg)
    if (Path(a.run) / "summary.json").is_file():  # a finished run: its report shows the study
        print(f"[study] report: {write_report(a.run)}", flush=True)
    return 0


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="llama2 pipeline", description=__doc__.split("\n\n")[0],
                                epilog="Overrides use dotted keys, e.g. versions=2 sft.epochs=1.")
    p.add_argument("--config", help="YAML file (configs/pipeline/tiny.yaml for the built-in CPU run)")
    p.add_argument("--from-stage", help="rerun from this stage (see --list-stages)")
    p.add_argument("--list-stages", action="store_true", help="print the stages of this configuration and exit")
    p.add_argument("--print-config", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)
    cfg = load_config(PipelineConfig, a.config, a.overrides)
    if a.list_stages:
        print("\n".join(stage_names(cfg)))
        return 0
    if a.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    return main(cfg, from_stage=a.from_stage)


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
